"""What a step costs, read off the compiled program: collectives, memory, explain. It
compiles nothing of its own: :mod:`jtp.training.compile` gives it the program."""
