name = "rapidocr"
input_type = "file"
example = [
    "examples/invoice.png",
    "examples/sign.png",
    "examples/note.png",
]
