"""The page list the router shows."""
from __future__ import annotations

import streamlit as st


def all_pages() -> list:
    return [st.Page("dynviz/ui/models_page.py", title="Models", icon=":material/table:",
                    url_path="models", default=True)]
