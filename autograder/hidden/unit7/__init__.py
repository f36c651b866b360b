"""Hidden tests of Unit 7 (a package so that the test files share _common)."""
