from moe2.cli import app

app()
