from dsctl.cli import app

app(prog_name="dsctl")
