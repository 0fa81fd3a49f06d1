"""Built-in device backends; each module is a plugin registered through the ``tensorweave`` entry points."""
