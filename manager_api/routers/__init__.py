"""REST resources of the manager, one router each, mounted under /api/v1."""
