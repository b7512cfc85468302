{
  "targets": [
    {
      "target_name": "qemu_snap_native",
      "sources": ["native/qemu_snap_native.c"],
      "cflags": ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
