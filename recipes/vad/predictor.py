"""Voice activity detection with Silero VAD (ONNX, torch-free).

Uses the ONNX model shipped inside the `silero-vad` wheel (installed with
--no-deps so torch is never pulled in). The `silero_vad` Python package itself
is NOT imported (its __init__ imports torch); only its data file is located.

Two engines, same (bit-exact) probabilities, chosen with VAD_ENGINE:

* "batch" (default): the streaming model silero_vad.onnx takes (batch, 64 + 512)
  samples and a (2, batch, 128) state, so the files of one batch are run
  together, one ONNX call per 512-sample window step, each file carrying its
  own state. Files are sorted by length and the batch shrinks as the shorter
  files finish, so no compute is spent on padding. Batching pays here.
* "sequence": silero_vad_16k_sequence.onnx runs all frames of one file in one
  ONNX call (the LSTM loop happens inside ONNX Runtime). Files are processed
  one by one; already fast at batch size 1, so batching gains nothing.
"""

import importlib.util
import os
import wave

import numpy as np
import onnxruntime as ort

SAMPLE_RATE = 16000
WINDOW = 512  # samples per frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees

# segmentation parameters (silero-vad's get_speech_timestamps defaults)
THRESHOLD = 0.5
NEG_THRESHOLD = THRESHOLD - 0.15
MIN_SPEECH_MS = 250
MIN_SILENCE_MS = 100
SPEECH_PAD_MS = 30


ENGINE = os.environ.get("VAD_ENGINE", "batch").strip().lower()
if ENGINE not in ("batch", "sequence"):
    raise ValueError(f"VAD_ENGINE must be 'batch' or 'sequence', not {ENGINE!r}")
SEQUENCE_BLOCK = 2048  # max frames per ONNX call for the sequence engine (~65 s)


def _model_path(engine=ENGINE):
    env = os.environ.get("SILERO_VAD_ONNX")
    if env:
        return env
    # find_spec on a top-level package does not execute its __init__ (which imports torch)
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed: pip install --no-deps silero-vad==6.2.3")
    return os.path.join(list(spec.submodule_search_locations)[0], "data",
                        "silero_vad.onnx" if engine == "batch" else "silero_vad_16k_sequence.onnx")


def _threads():
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


_opts = ort.SessionOptions()
_opts.intra_op_num_threads = _threads()
_opts.inter_op_num_threads = 1
_opts.log_severity_level = 3
_session = ort.InferenceSession(_model_path(), sess_options=_opts,
                                providers=["CPUExecutionProvider"])
_SR = np.array(SAMPLE_RATE, dtype=np.int64)


def read_wav(path):
    """Read a PCM WAV file as mono float32 at 16 kHz using only stdlib + numpy."""
    with wave.open(path, "rb") as w:
        sr, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width == 2:
        audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:  # 8-bit WAV is unsigned
        audio = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        audio = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v & 0x800000, v - 0x1000000, v)
        audio = v.astype(np.float32) / 8388608.0
    else:
        raise ValueError(f"unsupported sample width {width}")
    if channels > 1:
        audio = audio[: len(audio) - len(audio) % channels].reshape(-1, channels).mean(axis=1)
    if sr != SAMPLE_RATE:
        if sr % SAMPLE_RATE == 0:  # 32k, 48k: decimate like silero-vad does
            audio = audio[:: sr // SAMPLE_RATE]
        else:  # anything else: linear interpolation (fine for VAD)
            n_out = int(round(len(audio) * SAMPLE_RATE / sr))
            audio = np.interp(np.arange(n_out) * (sr / SAMPLE_RATE),
                              np.arange(len(audio)), audio).astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def speech_probs(audios):
    """Per-frame speech probabilities for several 16 kHz float32 arrays at once."""
    n = len(audios)
    frames = [(len(a) + WINDOW - 1) // WINDOW for a in audios]
    order = sorted(range(n), key=lambda i: -frames[i])  # longest first
    T = frames[order[0]] if n else 0
    x = np.zeros((n, T * WINDOW + CONTEXT), dtype=np.float32)  # row = [64 zeros | audio | pad]
    for row, i in enumerate(order):
        x[row, CONTEXT: CONTEXT + len(audios[i])] = audios[i]
    active = np.array([frames[i] for i in order])  # descending
    probs = np.zeros((n, T), dtype=np.float32)
    state = np.zeros((2, n, 128), dtype=np.float32)
    k = n
    for t in range(T):
        while k and active[k - 1] <= t:  # drop files that have ended
            k -= 1
        s = t * WINDOW
        out, new_state = _session.run(None, {"input": x[:k, s: s + CONTEXT + WINDOW],
                                             "state": state[:, :k], "sr": _SR})
        probs[:k, t] = out[:, 0]
        state[:, :k] = new_state
    result = [None] * n
    for row, i in enumerate(order):
        result[i] = probs[row, : frames[i]]
    return result


def speech_probs_sequence(audio):
    """Per-frame probabilities for one file with the sequence model."""
    T = (len(audio) + WINDOW - 1) // WINDOW
    x = np.zeros(T * WINDOW + CONTEXT, dtype=np.float32)
    x[CONTEXT: CONTEXT + len(audio)] = audio
    # frame t = x[t*512 : t*512 + 576] (64 samples of context + 512 new ones)
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(T, CONTEXT + WINDOW), strides=(WINDOW * 4, 4), writeable=False)
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    out = []
    for b in range(0, T, SEQUENCE_BLOCK):
        p, h, c = _session.run(["speech_probs", "hn", "cn"],
                               {"input": np.ascontiguousarray(frames[b: b + SEQUENCE_BLOCK]),
                                "h": h, "c": c})
        out.append(p.reshape(-1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def segments_from_probs(probs, n_samples):
    """Port of silero-vad's get_speech_timestamps_from_probs (default settings,
    no max speech duration). Returns [[start_sample, end_sample], ...]."""
    min_speech = SAMPLE_RATE * MIN_SPEECH_MS / 1000
    min_silence = SAMPLE_RATE * MIN_SILENCE_MS / 1000
    pad = SAMPLE_RATE * SPEECH_PAD_MS / 1000
    triggered, temp_end, start, speeches = False, 0, None, []
    for i, p in enumerate(probs.tolist()):
        cur = WINDOW * i
        if p >= THRESHOLD and temp_end:
            temp_end = 0
        if p >= THRESHOLD and not triggered:
            triggered, start = True, cur
            continue
        if p < NEG_THRESHOLD and triggered:
            if not temp_end:
                temp_end = cur
            if cur - temp_end < min_silence:
                continue
            if temp_end - start > min_speech:
                speeches.append([start, temp_end])
            triggered, temp_end, start = False, 0, None
    if start is not None and n_samples - start > min_speech:
        speeches.append([start, n_samples])
    for i, sp in enumerate(speeches):
        if i == 0:
            sp[0] = int(max(0, sp[0] - pad))
        if i != len(speeches) - 1:
            gap = speeches[i + 1][0] - sp[1]
            if gap < 2 * pad:
                sp[1] += int(gap // 2)
                speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - gap // 2))
            else:
                sp[1] = int(min(n_samples, sp[1] + pad))
                speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - pad))
        else:
            sp[1] = int(min(n_samples, sp[1] + pad))
    return speeches


def predictor(inputs, batch_size=1):
    """inputs: list of paths to WAV files (16 kHz mono expected; other PCM WAVs
    are converted). Returns one dict per file, in order. A file that cannot be
    read gives {"error": "..."} instead of failing the whole batch."""
    results = [None] * len(inputs)
    ok, audios = [], []
    for i, path in enumerate(inputs):
        try:
            audios.append(read_wav(path))
            ok.append(i)
        except Exception as e:  # bad / non-WAV file
            results[i] = {"error": f"cannot read {os.path.basename(str(path))} as a PCM WAV file: "
                                   f"{type(e).__name__}: {e}"}
    step = max(1, int(batch_size or 1))
    for b in range(0, len(ok), step):
        idx, batch = ok[b: b + step], audios[b: b + step]
        if ENGINE == "batch":
            batch_probs = speech_probs(batch)
        else:
            batch_probs = [speech_probs_sequence(a) for a in batch]
        for i, audio, probs in zip(idx, batch, batch_probs):
            segs = segments_from_probs(probs, len(audio))
            segs_s = [[round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)] for s, e in segs]
            results[i] = {
                "speech": bool(segs),
                "speech_seconds": round(sum(e - s for s, e in segs) / SAMPLE_RATE, 3),
                "duration_seconds": round(len(audio) / SAMPLE_RATE, 3),
                "segments": segs_s,
            }
    return results
