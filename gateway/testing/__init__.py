"""Test doubles shipped for the demo and the test suite, never used by `gateway serve`."""
