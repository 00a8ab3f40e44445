input_type = "file"
example = ["examples/a.bin"]
