name = "two-stage chain"
example = [1, 2, 3]
