"""Streamlit pages: collect inputs, call the library, render what it returns."""
