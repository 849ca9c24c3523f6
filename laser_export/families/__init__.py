"""Family data files (one JSON per model family), read by laser_export.architectures."""
