name = "image_info"
input_type = "file"
example = ["examples/red.png", "examples/gradient.jpg"]
