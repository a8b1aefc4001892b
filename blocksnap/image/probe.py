"""What a file's first bytes say it is: the one table of image magics (qcow2, and the formats blocksnap does
not read, which are refused instead of being read as raw)."""
QCOW2_MAGIC = b"QFI\xfb"
FOREIGN_MAGICS = ((b"KDMV", "vmdk"), (b"# Disk DescriptorFile", "vmdk"), (b"conectix", "vpc (vhd)"),
                  (b"vhdxfile", "vhdx"), (b"QED\0", "qed"), (b"LUKS\xba\xbe", "luks"))
VDI_TEXT = b"<<< Oracle VM VirtualBox"
HEAD_BYTES = 64


def format_of(head):
    """ "qcow2", "raw", or the name of a format blocksnap does not read, from a file's first HEAD_BYTES bytes."""
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    for magic, name in FOREIGN_MAGICS:
        if head.startswith(magic):
            return name
    if VDI_TEXT in head:
        return "vdi"
    return "raw"
