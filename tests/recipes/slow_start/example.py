example = [1]
