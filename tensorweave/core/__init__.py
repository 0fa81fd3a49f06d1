"""The backend-agnostic heart of tensorweave. Imports no backend, no communicator and no model."""
