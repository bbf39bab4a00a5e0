"""Unit tests of the molgen_export.dcp stage."""
