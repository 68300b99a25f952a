"""dynviz web app: a thin router over the pages in dynviz/ui/."""
import streamlit as st

from dynviz.ui import pages

st.set_page_config(page_title="dynviz", layout="wide")
st.navigation(pages.all_pages()).run()
