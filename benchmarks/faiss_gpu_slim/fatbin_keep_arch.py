import struct, sys, collections
path = sys.argv[1]
data = bytearray(open(path, 'rb').read())
# locate .nv_fatbin section via readelf-like parsing
import subprocess
out = subprocess.check_output(['readelf', '-S', '-W', path]).decode()
for line in out.splitlines():
    if '.nv_fatbin' in line:
        parts = line.split(']')[1].split()
        off, size = int(parts[3], 16), int(parts[4], 16)
pos, end = off, off + size
stats = collections.Counter(); sizes = collections.Counter()
entries = []
while pos < end:
    magic, ver, hsize, fsize = struct.unpack_from('<IHHQ', data, pos)
    if magic != 0xBA55ED50:
        pos += 8; continue
    p, stop = pos + hsize, pos + hsize + fsize
    while p < stop:
        kind, ever, ehsize, psize = struct.unpack_from('<HHIQ', data, p)
        arch = struct.unpack_from('<I', data, p + 28)[0]
        flags = struct.unpack_from('<Q', data, p + 40)[0]
        entries.append((kind, arch, p + ehsize, psize, flags))
        stats[(kind, arch)] += 1; sizes[(kind, arch)] += psize
        p += ehsize + psize
    pos = stop
for k in sorted(stats): print(k, stats[k], sizes[k])
if len(sys.argv) > 2:
    keep = int(sys.argv[2])
    zeroed = 0
    for kind, arch, start, psize, flags in entries:
        if not (kind == 2 and arch == keep):
            data[start:start + psize] = bytes(psize); zeroed += psize
    open(sys.argv[3], 'wb').write(data)
    print('zeroed', zeroed)
