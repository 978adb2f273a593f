"""The Serve app's plain parts (no Ray): authentication and bounded request bodies."""
