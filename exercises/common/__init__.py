"""Course code shared by Units 4-6: read it, do not edit it (the grader uses the course's copy)."""
