"""Unit tests of the molgen_export.watch stage."""
