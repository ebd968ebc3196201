"""The programs (train, bench, capacity planner) and what only they share.

The library never imports this package."""
