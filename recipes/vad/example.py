name = "silero_vad"
input_type = "file"
example = [
    "examples/speech_hello.wav",
    "examples/speech_weather.wav",
    "examples/speech_numbers.wav",
    "examples/tone_noise.wav",
    "examples/white_noise.wav",
    "examples/hum.wav",
]
