"""Regenerate the example WAV files in ./examples/ (16 kHz, mono, 16-bit PCM).

    python make_examples.py

Speech clips need the `espeak-ng` program (Debian: `apt-get install -y espeak-ng`).
espeak-ng writes 22050 Hz audio; it is resampled to 16 kHz with `sox` when sox is
on PATH, otherwise with numpy (linear interpolation, good enough for VAD).
The non-speech clips (tones, hum, noise) are generated with numpy alone and
are deterministic (fixed seed). Only numpy and the standard library are used.

Expected predictor results: speech_*.wav -> speech True, the rest -> False.
"""

import os
import shutil
import subprocess
import tempfile
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "examples")
SR = 16000
MAX_SECONDS = 3.0

SPEECH = {
    "speech_hello.wav": "Hello, this is a voice test.",
    "speech_weather.wav": "The weather today is sunny and warm.",
    "speech_numbers.wav": "One two three four five six.",
}


def write_wav(path, audio):
    """Write float audio in [-1, 1] as 16 kHz mono 16-bit PCM."""
    pcm = np.clip(audio, -1.0, 1.0)
    pcm = (pcm * 32767.0).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def read_wav(path):
    with wave.open(path, "rb") as w:
        sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    assert width == 2, "expected 16-bit PCM"
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        audio = audio.reshape(-1, ch).mean(axis=1)
    return audio, sr


def resample(audio, sr_in, sr_out=SR):
    if sr_in == sr_out:
        return audio
    n_out = int(round(len(audio) * sr_out / sr_in))
    t_out = np.arange(n_out) * (sr_in / sr_out)
    return np.interp(t_out, np.arange(len(audio)), audio).astype(np.float32)


def make_speech(path, text):
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        # -s: words per minute (a bit faster than default keeps clips <= 3 s)
        subprocess.run(["espeak-ng", "-s", "165", "-w", raw, text], check=True)
        if shutil.which("sox"):
            conv = os.path.join(tmp, "16k.wav")
            # gain -3 dB first so resampling cannot clip
            subprocess.run(["sox", raw, "-c", "1", "-b", "16", conv, "gain", "-3", "rate", str(SR)],
                           check=True)
            audio, sr = read_wav(conv)
        else:
            audio, sr = read_wav(raw)
            audio = resample(audio, sr)
    audio = audio[: int(MAX_SECONDS * SR)]
    # a little leading/trailing silence, like a real recording
    pad = np.zeros(int(0.2 * SR), dtype=np.float32)
    write_wav(path, np.concatenate([pad, audio, pad])[: int(MAX_SECONDS * SR)])


def make_non_speech():
    rng = np.random.default_rng(1234)
    t2 = np.arange(int(2.0 * SR)) / SR
    clips = {
        # 440 Hz tone with some white noise
        "tone_noise.wav": 0.3 * np.sin(2 * np.pi * 440 * t2) + 0.05 * rng.standard_normal(t2.size),
        # plain white noise
        "white_noise.wav": 0.1 * rng.standard_normal(int(1.5 * SR)),
        # 50 Hz mains hum plus harmonics and a faint hiss
        "hum.wav": (0.2 * np.sin(2 * np.pi * 50 * t2) + 0.1 * np.sin(2 * np.pi * 150 * t2)
                    + 0.02 * rng.standard_normal(t2.size)),
    }
    for name, audio in clips.items():
        write_wav(os.path.join(OUT, name), audio.astype(np.float32))


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, text in SPEECH.items():
        make_speech(os.path.join(OUT, name), text)
    make_non_speech()
    for name in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, name)
        with wave.open(p, "rb") as w:
            print(f"{name:20s} {w.getnframes() / w.getframerate():5.2f}s {os.path.getsize(p) // 1024:4d} KB")


if __name__ == "__main__":
    main()
