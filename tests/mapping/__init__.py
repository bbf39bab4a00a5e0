"""Unit tests of the molgen_export.mapping stage."""
