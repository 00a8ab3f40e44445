name = "echo"
example = ["hello", {"a": 1}, [1, 2, 3], 4.5]
