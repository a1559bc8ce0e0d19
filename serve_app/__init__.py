"""photo3d: photo in, textured 3D model out, served by Ray Serve with PostgreSQL as the queue."""

__version__ = "0.1.0"
