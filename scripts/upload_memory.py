"""Peak memory of decoding an upload (``dynviz.uploads.preprocess_upload``), per kind of input.

    .venv/bin/python scripts/upload_memory.py [--ref DIR] [--kinds NAME ...] [--keep DIR]

Every input is generated here (``INPUTS``), written to a temporary directory, and decoded in
a fresh Python process. That process imports dynviz, reads the file, then resets its peak
RSS (``/proc/self/clear_refs``) and decodes; the figure is the peak RSS (``VmHWM``) minus the
RSS just before decoding. ``ru_maxrss`` would not do: a child process inherits its parent's
peak through fork, and it cannot be reset. PIL allocates in C, out of tracemalloc's sight.

``--ref DIR``: also measure the dynviz package found in DIR (for instance the code this work
started from: ``mkdir /tmp/ref && git archive 2adff89 dynviz | tar -x -C /tmp/ref``).
Prints a Markdown table. Linux only.
"""
from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import workspace  # noqa: E402

MB = 2**20


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png16_uniform() -> bytes:
    """The server's case: 6300×6300 16-bit grey, one value, ~77 KB of PNG."""
    return _encode(Image.new("I;16", (6300, 6300), 40000), "PNG")


def tiff_float() -> bytes:
    """4500×4500 float32 (mode F) in [0, 1], deflate-compressed."""
    return _encode(Image.new("F", (4500, 4500), 0.25), "TIFF", compression="tiff_deflate")


def ico_wrapping_png() -> bytes:
    """An ICO whose directory declares 16×16 but whose entry is a 6000×6000 RGBA PNG (PIL
    reads the PNG's own header and decodes it at that size)."""
    png = _encode(Image.new("RGBA", (6000, 6000), (10, 20, 30, 128)), "PNG")
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def png_header_understates() -> bytes:
    """A PNG whose header declares 64×64 RGB but whose data holds 6000×6000 rows' worth."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * 6000) * 6000, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def tiff_huge_second_frame() -> bytes:
    """Two TIFF pages: 64×64, then 6000×6000 RGB."""
    return _encode(Image.new("RGB", (64, 64), (200, 0, 0)), "TIFF", compression="tiff_deflate",
                   save_all=True, append_images=[Image.new("RGB", (6000, 6000), (0, 0, 200))])


def gif_huge_second_frame() -> bytes:
    """A 64×64 GIF whose second frame's descriptor reaches to 6000×6000 (PIL grows the canvas
    when it reaches that frame)."""
    small = _encode(Image.new("P", (64, 64), 1), "GIF")
    big = _encode(Image.new("P", (6000, 6000), 2), "GIF")
    flags = big[10]   # after it: a global colour table of 3·2^(n+1) bytes, then the frame
    start = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    return small[:small.rindex(b";")] + big[start:big.rindex(b";")] + b";"


def jpeg(width: int, height: int) -> Callable[[], bytes]:
    def make() -> bytes:
        img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        return _encode(img, "JPEG", quality=90)
    make.__doc__ = f"A {width}×{height} JPEG (smooth gradient)."
    return make


def png_rgba() -> bytes:
    """An ordinary large RGBA PNG, 6000×6000, half transparent."""
    return _encode(Image.new("RGBA", (6000, 6000), (10, 20, 30, 128)), "PNG")


def webp(side: int) -> Callable[[], bytes]:
    def make() -> bytes:
        return _encode(Image.new("RGB", (side, side), (10, 200, 30)), "WEBP", lossless=True)
    make.__doc__ = f"A {side}×{side} lossless WebP."
    return make


@dataclass(frozen=True)
class Input:
    make: Callable[[], bytes]
    decoded_mb: float   # one decoded copy at its own depth, as PIL holds it (0: refused)


INPUTS = {
    "16-bit PNG 6300×6300": Input(png16_uniform, 6300 * 6300 * 2 / MB),
    "float TIFF 4500×4500": Input(tiff_float, 4500 * 4500 * 4 / MB),
    "ICO (says 16×16) holding a 6000×6000 PNG": Input(ico_wrapping_png, 6000 * 6000 * 4 / MB),
    "PNG declaring 64×64, data for 6000×6000": Input(png_header_understates, 64 * 64 * 4 / MB),
    "TIFF 64×64, second page 6000×6000": Input(tiff_huge_second_frame, 64 * 64 * 4 / MB),
    "GIF 64×64, second frame 6000×6000": Input(gif_huge_second_frame, 64 * 64 / MB),
    "JPEG 7800×5000": Input(jpeg(7800, 5000), 975 * 625 * 4 / MB),   # decoded at 1/8
    "JPEG 8000×6000": Input(jpeg(8000, 6000), 1000 * 750 * 4 / MB),
    "RGBA PNG 6000×6000": Input(png_rgba, 6000 * 6000 * 4 / MB),
    "WebP 3000×3000": Input(webp(3000), 3000 * 3000 * 4 / MB),
    "WebP 6000×6000": Input(webp(6000), 6000 * 6000 * 4 / MB),
}

_CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
try:
    from dynviz import uploads
except ImportError:          # an older package (--ref): the function lived in dynviz.data
    from dynviz import data as uploads

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
raw = Path(sys.argv[2]).read_bytes()
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
try:
    out = uploads.preprocess_upload(raw, int(sys.argv[3]))
    outcome = f"accepted {out.shape}"
except uploads.InvalidImageError as err:
    outcome = f"refused: {err}"
print(json.dumps({"peak_mb": (status("VmHWM") - before) / 2**20, "outcome": outcome,
                  "module": uploads.__file__}))
"""


def measure(path: Path, code_root: Path = ROOT, size: int | None = None) -> dict:
    """Decode ``path`` to ``size`` (default: the built-in workspace's image size) with the
    dynviz package under ``code_root`` in a fresh process: {"peak_mb": peak RSS over the RSS
    before decoding, "outcome": "accepted …" or "refused: …", "module": the file that ran}."""
    size = size or workspace.builtin().data.image_size
    done = subprocess.run([sys.executable, "-c", _CHILD, str(code_root), str(path), str(size)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_inputs(directory: Path, kinds: list[str]) -> dict[str, Path]:
    paths = {}
    for i, kind in enumerate(kinds):
        paths[kind] = directory / f"input{i}"
        paths[kind].write_bytes(INPUTS[kind].make())
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ref", type=Path,
                        help="a directory holding an older dynviz package to measure too")
    parser.add_argument("--kinds", nargs="+", choices=list(INPUTS), default=list(INPUTS),
                        metavar="KIND", help="inputs to measure (default: all)")
    parser.add_argument("--keep", type=Path, help="write the inputs here and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        paths = write_inputs(directory, args.kinds)
        header = ["input", "file KB", "one decoded copy MB"]
        header += ["before: peak MB", "before: outcome"] if args.ref else []
        header += ["peak MB", "outcome"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for kind, path in paths.items():
            row = [kind, f"{path.stat().st_size / 1024:.1f}", f"{INPUTS[kind].decoded_mb:.1f}"]
            for code_root in ([args.ref] if args.ref else []) + [ROOT]:
                result = measure(path, code_root)
                row += [f"{result['peak_mb']:.0f}", result["outcome"].split(" (")[0]]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
