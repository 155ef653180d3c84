"""Small real HTTP servers on loopback that stand in for destinations in the tests."""
