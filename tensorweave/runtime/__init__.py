"""The runtime: a loaded model over devices (``Model``), its sessions (KV cache and positions), and generation."""
