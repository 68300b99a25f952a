"""The page list the router shows."""
from __future__ import annotations

import streamlit as st


def all_pages() -> list:
    return [
        st.Page("dynviz/ui/inspect_page.py", title="Inspect", icon=":material/search:",
                default=True),  # served at /
        st.Page("dynviz/ui/budget_page.py", title="Budget", icon=":material/tune:",
                url_path="budget"),
        st.Page("dynviz/ui/galleries_page.py", title="Galleries", icon=":material/grid_view:",
                url_path="galleries"),
        st.Page("dynviz/ui/models_page.py", title="Models", icon=":material/table:",
                url_path="models"),
    ]
