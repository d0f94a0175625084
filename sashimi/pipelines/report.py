"""Listening page for generated audio: WAV files, spectrogram PNGs, samples.json and an offline index.html.

    from sashimi.pipelines.report import write_report
    paths = write_report("samples/", result, info={"checkpoint": "runs/tiny/best.pt"})
    paths["index"]   # samples/index.html: open it in a browser, no network needed

The page uses no scripts, external stylesheets or fonts: an <audio controls> player and a
spectrogram image per sample, each referring to a file next to it by a relative name.
"""

from __future__ import annotations

import html
import math
import os

import numpy as np

from ..data.audio import save_audio
from ..files import atomic_write, write_json

__all__ = ["write_report", "spectrogram_png", "SPECTROGRAM_FLOOR_DB"]

SPECTROGRAM_FLOOR_DB = -200.0  # the power (dB) drawn for silence, where the spectrum is exactly zero

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
.sample { border-top: 1px solid #ddd; padding: 1em 0; }
.sample img { display: block; max-width: 100%; margin-top: 0.5em; }
.note { color: #666; font-size: 0.9em; }
"""


def spectrogram_png(path: str, audio: np.ndarray, sample_rate: int, title: str = "", mark_seconds: float | None = None):
    """Write a log-magnitude spectrogram of a waveform (T,) as a PNG (matplotlib Agg, no display needed).

    mark_seconds draws a vertical line there (the end of a prompt).
    """
    import io

    from matplotlib import mlab
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    audio = np.asarray(audio, dtype=np.float64)
    fig = Figure(figsize=(8, 2.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n_fft = 512 if len(audio) >= 2048 else max(16, 2 ** int(math.log2(max(len(audio) // 4, 16))))
    if len(audio) >= n_fft:
        hop = n_fft - n_fft * 3 // 4
        power, freqs, times = mlab.specgram(audio, NFFT=n_fft, Fs=sample_rate, noverlap=n_fft - hop)
        # silent stretches have zero power: floor it (at SPECTROGRAM_FLOOR_DB) before taking the log
        db = 10 * np.log10(np.maximum(power, 10 ** (SPECTROGRAM_FLOOR_DB / 10)))
        loud = np.abs(audio).max() > 1e-4  # a silent clip's spectrum lies below -120 dB: let the colours autoscale
        pad = hop / sample_rate / 2  # each column covers its hop, as matplotlib's Axes.specgram draws it
        ax.imshow(np.flipud(db), cmap="magma", vmin=-120 if loud else None, aspect="auto", origin="upper",
                  extent=(times.min() - pad, times.max() + pad, freqs[0], freqs[-1]))
    else:  # too short for one frame: show the waveform instead
        ax.plot(np.arange(len(audio)) / sample_rate, audio, lw=0.5)
    if mark_seconds:
        ax.axvline(mark_seconds, color="cyan", lw=1, ls="--")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write(path, buffer.getvalue())


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


# Sample-quality scores shown on the page (key in sashimi.metrics.score's dict, label, which way is better)
_SCORE_ROWS = (("fid", "FID (classifier features)", "lower"), ("is", "Inception Score", "higher"),
               ("mis", "modified Inception Score", "higher"), ("am", "AM score", "lower"),
               ("ndb", "NDB (differing bins)", "lower"), ("mel_fd", "mel-statistics Fréchet distance", "lower"))


def _scores_section(scores: dict) -> str:
    rows = "".join(
        f"<tr><th>{label}</th><td>{html.escape(_fmt(scores[key]))}"
        + (f" / {scores['ndb_bins']}" if key == "ndb" else "")
        + f"</td><td>{better} is better</td><td>"
        + (html.escape(_fmt(scores.get("real_" + key))) if scores.get("real_" + key) is not None else "")
        + "</td></tr>" for key, label, better in _SCORE_ROWS if key in scores)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in scores.get("notes", []))
    return (f"<h2>Sample quality</h2><p>{scores.get('n_fake')} generated clips against {scores.get('n_real')} real "
            f"clips; evaluation classifier held-out accuracy {_fmt(scores.get('classifier_test_accuracy'))} "
            f"(docs/metrics.md).</p><table><tr><th>score</th><th>generated</th><th></th><th>real clips</th></tr>"
            f"{rows}</table>" + (f"<ul class=\"note\">{notes}</ul>" if notes else ""))


def _reference_cards(out_dir: str, references: dict) -> tuple[list[str], list[str]]:
    """real_000.wav/.png for each reference clip; (cards, wav paths)."""
    cards, wavs = [], []
    rate = references["sample_rate"]
    names = references.get("labels") or [None] * len(references["audio"])
    for i, (audio, label) in enumerate(zip(references["audio"], names)):
        audio = np.asarray(audio, dtype=np.float32)
        wav_name, png_name = f"real_{i:03d}.wav", f"real_{i:03d}.png"
        save_audio(os.path.join(out_dir, wav_name), audio, rate)
        spectrogram_png(os.path.join(out_dir, png_name), audio, rate, title=f"real clip {i}" + (f": {label}" if label else ""))
        wavs.append(os.path.join(out_dir, wav_name))
        cards.append(f'<div class="sample"><h3>{html.escape(wav_name)}' + (f" ({html.escape(label)})" if label else "")
                     + f'</h3><audio controls preload="none" src="{html.escape(wav_name)}"></audio>'
                     f'<img src="{html.escape(png_name)}" alt="spectrogram of {html.escape(wav_name)}"></div>')
    return cards, wavs


def write_report(out_dir: str, result, info: dict | None = None, title: str = "sashimi samples",
                 stem: str = "sample", scores: dict | None = None, references: dict | None = None) -> dict:
    """Write sample_000.wav, sample_000.png, ... , samples.json and index.html for a generation result.

    result: a GenerationResult, WaveFlowResult or FlowGenerationResult (audio, sample_rate,
    summary() with "settings", "throughput" and "samples"; a sample's likelihood and condition are
    shown when its entry has them).

    info: extra JSON-able facts shown on the page and stored under "info" in samples.json
    (checkpoint, validation bits/sample, ...). scores: a `sashimi.metrics.score` dict, shown
    as a table and stored under "scores". references: {"audio": (R, T), "sample_rate", "labels"}
    real clips written as real_000.wav ... and shown before the samples. Returns {"index",
    "json", "wavs", "pngs"} paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    info = dict(info or {})
    rate = result.sample_rate
    summary = result.summary()
    prefix_len = getattr(result, "prefix_len", 0)
    prefix_seconds = prefix_len / rate if prefix_len else None
    wavs, pngs, cards = [], [], []
    for i, entry in enumerate(summary["samples"]):
        wav_name, png_name = f"{stem}_{i:03d}.wav", f"{stem}_{i:03d}.png"
        audio = result.audio[i].numpy()
        save_audio(os.path.join(out_dir, wav_name), audio, rate)
        label = f"{stem} {i}"
        if entry.get("condition") is not None:
            label += f" ({entry['condition']})"
        if entry.get("bits_per_sample") is not None:
            label += f": {entry['bits_per_sample']:.3f} bits/sample"
        spectrogram_png(os.path.join(out_dir, png_name), audio, rate, title=label, mark_seconds=prefix_seconds)
        wavs.append(os.path.join(out_dir, wav_name))
        pngs.append(os.path.join(out_dir, png_name))
        entry.update({"wav": wav_name, "spectrogram": png_name, "seconds": len(audio) / rate})
        note = ""
        if entry.get("log_likelihood_bits") is not None:
            note = (f'<div class="note">log-likelihood {entry["log_likelihood_bits"]:.1f} bits over '
                    f'{result.n_generated} generated samples = {entry["bits_per_sample"]:.3f} bits/sample</div>')
        elif entry.get("condition") is not None:
            note = f'<div class="note">condition: {html.escape(str(entry["condition"]))}</div>'
        cards.append(
            f'<div class="sample"><h3>{html.escape(wav_name)}</h3>'
            f'<audio controls preload="none" src="{html.escape(wav_name)}"></audio> '
            f'<a href="{html.escape(wav_name)}">download</a>{note}'
            f'<img src="{html.escape(png_name)}" alt="spectrogram of {html.escape(wav_name)}"></div>')

    record = {"info": info, **summary}
    if scores is not None:
        record["scores"] = scores
    reference_cards, _ = _reference_cards(out_dir, references) if references else ([], [])
    json_path = os.path.join(out_dir, "samples.json")
    write_json(json_path, record, default=str)

    throughput = summary["throughput"]
    settings = {k: v for k, v in summary["settings"].items() if v is not None}
    speed = (f"{throughput['samples_per_second']:,.0f} samples/s = {throughput['real_time_factor']:.3f}x real time "
             f"({throughput['path']} path, {throughput['generated_samples']:,} samples in "
             f"{throughput['seconds']:.1f} s, model loading excluded)")
    prompt = ""
    if prefix_len:
        prompt = (f'<p class="note">Each sample starts with the {prefix_len / rate:.3f} s prompt '
                  f'(dashed line on the spectrogram); the likelihoods count only the generated part.</p>')
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{len(wavs)} samples, {result.audio.shape[1] / rate:.3f} s each at {rate} Hz. "
        f"Generation speed: {html.escape(speed)}.</p>{prompt}"
        + (f"<h2>Run</h2>{_table(info)}" if info else "")
        + (_scores_section(scores) if scores is not None else "")
        + f"<h2>Settings</h2>{_table(settings)}"
        + (f"<h2>Real clips (the data)</h2>{''.join(reference_cards)}" if reference_cards else "")
        + f"<h2>Samples</h2>{''.join(cards)}"
        "<p class=\"note\">Per-sample numbers are in samples.json.</p></body></html>\n")
    index_path = os.path.join(out_dir, "index.html")
    atomic_write(index_path, page.encode())
    return {"index": index_path, "json": json_path, "wavs": wavs, "pngs": pngs}
