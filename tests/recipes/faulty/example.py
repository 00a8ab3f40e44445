example = ["a", "b", 1, 2.5]
