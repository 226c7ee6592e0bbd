"""The image and container store: layers unpacked once and shared, images and containers in
SQLite, and images in and out as the archives other tools write and read."""
