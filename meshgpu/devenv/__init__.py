"""Dev environments and attach: the SSH server every agent runs into its jobs, the tunnel any
node offers to it (``meshgpu ssh-proxy``), and who is connected to which job (inactivity)."""
