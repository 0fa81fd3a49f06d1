"""Built-in communicators; each module is a plugin registered through the ``tensorweave`` entry points."""
