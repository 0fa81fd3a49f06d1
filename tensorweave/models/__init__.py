"""Model families (one file per architecture family); they arrive with the graph executor."""
