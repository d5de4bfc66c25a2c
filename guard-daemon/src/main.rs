fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard-ebpf"));
    let mut ebpf = aya::EbpfLoader::new().load(bytes).expect("load");
    for (name, prog) in ebpf.programs_mut() {
        println!("{name}: {:?}", prog.prog_type());
        let r = match prog {
            aya::programs::Program::CgroupSkb(p) => p.load(),
            aya::programs::Program::TracePoint(p) => p.load(),
            _ => Ok(()),
        };
        if let Err(e) = r { println!("ERR {name}: {e:?}"); }
    }
}
