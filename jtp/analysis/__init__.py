"""What a step costs, read off the compiled program: collectives, memory, explain, and
the abstract compile that gives them for devices that need not exist."""
