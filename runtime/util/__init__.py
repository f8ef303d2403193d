"""File, CLI and CPU utilities that every part of the project imports: training, export,
tools and the runtime itself. Nothing here imports the runtime's services."""
