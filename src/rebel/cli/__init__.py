"""Command-line tools, kept apart from the library so importing `rebel` never pulls in argparse or rich."""
