"""Unit tests of the molgen_export.verify stage."""
