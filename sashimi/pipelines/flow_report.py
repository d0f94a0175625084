"""The listening page of flow / diffusion samples: WAVs, spectrograms, samples.json (with the real-time factor), index.html."""

from __future__ import annotations

import html
import json
import os

from ..data.audio import save_audio
from .report import spectrogram_png

__all__ = ["write_flow_report"]


def write_flow_report(out_dir: str, result, info: dict | None = None, title: str = "sashimi flow samples") -> dict:
    """result: a FlowGenerationResult. Returns {"index", "json", "wavs"}."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"info": dict(info or {}), **result.summary()}
    wavs, cards = [], []
    for entry in record["samples"]:
        i = entry["index"]
        wav, png = f"sample_{i:03d}.wav", f"sample_{i:03d}.png"
        audio = result.audio[i].numpy()
        save_audio(os.path.join(out_dir, wav), audio, result.sample_rate)
        caption = f"sample {i}" + (f": {entry['condition']}" if entry["condition"] is not None else "")
        spectrogram_png(os.path.join(out_dir, png), audio, result.sample_rate, title=caption)
        entry.update({"wav": wav, "spectrogram": png})
        wavs.append(os.path.join(out_dir, wav))
        cards.append(f'<div><h3>{html.escape(caption)}</h3><audio controls preload="none" src="{wav}"></audio>'
                     f'<img src="{png}" alt="spectrogram of {wav}" style="display:block;max-width:100%"></div>')
    json_path = os.path.join(out_dir, "samples.json")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    s = result.info
    speed = (f"{result.n_samples} x {result.audio.shape[1] / result.sample_rate:.3f} s in {result.seconds:.2f} s: "
             f"{result.real_time_factor:.2f}x real time ({s.get('method')}, {s.get('steps')} steps, cfg {s.get('cfg')})")
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in {**record["info"], **s}.items())
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"</head><body style=\"font-family:sans-serif;max-width:60em;margin:2em auto\"><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(speed)}</p><table>{rows}</table>{''.join(cards)}</body></html>\n")
    index = os.path.join(out_dir, "index.html")
    with open(index, "w") as f:
        f.write(page)
    return {"index": index, "json": json_path, "wavs": wavs}
