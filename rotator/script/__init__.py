"""The folder of the script mitmproxy loads with -s from an installed package; nothing
else lives here, as mitmproxy puts a script's folder on sys.path while loading it."""
