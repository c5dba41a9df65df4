"""Services: the ingress every node serves (routing from the replicated state, the proxy, the
OpenAI-compatible model endpoint, rate limits, activation), replica probes, and the autoscaler."""
