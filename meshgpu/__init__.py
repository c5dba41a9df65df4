"""meshgpu."""
