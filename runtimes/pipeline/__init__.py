"""The pipeline runtime: serves one application by calling its stages through the sidecar's outbound listener."""
