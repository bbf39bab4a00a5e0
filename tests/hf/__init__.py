"""Unit tests of the molgen_export.hf stage."""
