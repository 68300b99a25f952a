"""Models: every registered architecture and the trained checkpoints present."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

import models
from dynviz import settings


def checkpoint_rows() -> list[dict]:
    rows = []
    for manifest in sorted(settings.checkpoint_dir().glob("*.json")):
        meta = json.loads(manifest.read_text())
        check = meta.get("metrics", {}).get("check", {})
        rows.append({"checkpoint": meta["name"], "model": meta["model"],
                     "check accuracy": check.get("accuracy"),
                     "MACs (M)": (check.get("macs_mean") or 0) / 1e6,
                     "epochs": len(meta.get("history", []))})
    return rows


def render() -> None:
    st.title("Models")
    rows = checkpoint_rows()
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="checkpoints")
    else:
        st.info("No trained checkpoints yet. Train one with "
                "`python -m dynviz train resnet20` (see `python -m dynviz train --help`).")
    st.subheader("Registered architectures")
    st.write(", ".join(f"`{name}`" for name in models.names()))


render()
