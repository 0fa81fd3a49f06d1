"""Model families (one file per architecture family) and the synthetic transformer used by tests and the demo."""
