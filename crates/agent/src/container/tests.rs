//! Unit tests of [`super`].

use super::spawn::read_pid;

#[test]
fn every_pid_reads_back_as_a_pid_even_one_whose_low_byte_is_e() {
    for pid in [1, 69, 325, 0x4545, 4_194_304] {
        let msg = crate::helper::pid_message(pid);
        assert_eq!(read_pid(&mut &msg[..]).expect("pid"), pid);
    }
}

#[test]
fn a_helper_error_reads_back_as_its_message() {
    let e = read_pid(&mut &b"Epivot_root /x: EINVAL"[..]).expect_err("error");
    assert_eq!(e.to_string(), "pivot_root /x: EINVAL");
    let e = read_pid(&mut &b""[..]).expect_err("eof");
    assert!(
        e.to_string().contains("exited before it reported a pid"),
        "{e}"
    );
    let e = read_pid(&mut &b"P\x01"[..]).expect_err("short");
    assert!(e.to_string().contains("pid"), "{e}");
}
