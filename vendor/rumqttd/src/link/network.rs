use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use std::{
    collections::VecDeque,
    io::{self, ErrorKind},
};
use tokio::time::{error::Elapsed, Duration};

use crate::protocol::{self, AckWait, Packet, Protocol, QoS};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O = {0}")]
    Io(#[from] io::Error),
    #[error("Invalid data = {0}")]
    Protocol(#[from] protocol::Error),
    #[error["Keep alive timeout"]]
    KeepAlive(#[from] Elapsed),
}

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network<P> {
    /// Socket for IO
    socket: Box<dyn N>,
    /// Buffered reads
    read: BytesMut,
    /// Buffered writes
    write: BytesMut,
    /// Maximum packet size
    max_incoming_size: usize,
    /// Maximum connection buffer count. TODO: Change this to use bytes for deterministicness
    max_connection_buffer_len: usize,
    /// Keep alive timeout
    keepalive: Duration,
    /// Protocol
    protocol: P,
    /// mqlb patch (Maximum Packet Size): the client's Maximum Packet Size from its CONNECT
    /// (MQTT-3.1.2-24); `None`: no limit beyond the protocol's.
    max_outgoing_size: Option<usize>,
    /// mqlb patch (across the cluster, issue 12): the waits the codec gave for the QoS 1/2
    /// PUBLISHes read, with their packet ids, for the link to take ([`Network::take_ack_waits`]).
    ack_waits: VecDeque<(u16, AckWait)>,
}

impl<P: Protocol> Network<P> {
    pub fn new(
        socket: Box<dyn N>,
        max_incoming_size: usize,
        max_connection_buffer_len: usize,
        protocol: P,
    ) -> Network<P> {
        Network {
            socket,
            read: BytesMut::with_capacity(10 * 1024),
            write: BytesMut::with_capacity(10 * 1024),
            max_incoming_size,
            max_connection_buffer_len,
            // Overwritten by keepalive value in connect packet, otherwise we
            // would wait indefinitely until we get a packet / network error
            // when we call read.
            keepalive: Duration::MAX,
            protocol,
            max_outgoing_size: None,
            ack_waits: VecDeque::new(),
        }
    }

    pub fn set_keepalive(&mut self, keepalive: u16) {
        // mqlb patch: 0 means no keep alive (MQTT 3.1.2.10): never time the client out.
        if keepalive == 0 {
            self.keepalive = Duration::MAX;
            return;
        }
        let keepalive = Duration::from_secs(keepalive as u64);
        self.keepalive = keepalive + keepalive.mul_f32(0.5);
    }

    /// Reads more than 'required' bytes to frame a packet into self.read buffer
    async fn read_bytes(&mut self, required: usize) -> io::Result<usize> {
        // TODO: Fix this cancellation bug and write unit test
        let mut total_read = 0;
        loop {
            let read = self.socket.read_buf(&mut self.read).await?;
            if 0 == read {
                let error = if self.read.is_empty() {
                    io::Error::new(ErrorKind::ConnectionAborted, "connection closed by peer")
                } else {
                    io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer")
                };

                return Err(error);
            }

            total_read += read;
            if total_read >= required {
                return Ok(total_read);
            }
        }
    }

    /// Waits on network for 1 packet
    pub async fn read(&mut self) -> Result<Packet, Error> {
        loop {
            let required = match Protocol::read_mut(
                &mut self.protocol,
                &mut self.read,
                self.max_incoming_size,
            ) {
                Ok(packet) => {
                    self.ask_ack_wait(&packet);
                    return Ok(packet);
                }
                Err(protocol::Error::InsufficientBytes(required)) => required,
                Err(e) => return Err(e.into()),
            };

            // read more packets until a frame can be created. This function
            // blocks until a frame can be created. Use this in a select! branch
            timeout(self.keepalive, self.read_bytes(required)).await??;
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub fn readv(&mut self, packets: &mut VecDeque<Packet>) -> Result<usize, Error> {
        loop {
            match self
                .protocol
                .read_mut(&mut self.read, self.max_incoming_size)
            {
                Ok(packet) => {
                    self.ask_ack_wait(&packet);
                    packets.push_back(packet);
                    let connection_buffer_length = packets.len();
                    if connection_buffer_length >= self.max_connection_buffer_len {
                        return Ok(connection_buffer_length);
                    }
                }
                Err(protocol::Error::InsufficientBytes(_)) => return Ok(packets.len()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    /// mqlb patch (across the cluster, issue 12): after a PUBLISH, the codec's wait for its
    /// acknowledgement, if any (asked for every PUBLISH, so none is left for the next one).
    fn ask_ack_wait(&mut self, packet: &Packet) {
        if let Packet::Publish(p, _) = packet {
            if let Some(wait) = self.protocol.ack_wait() {
                if p.qos != QoS::AtMostOnce {
                    self.ack_waits.push_back((p.pkid, wait));
                }
            }
        }
    }

    /// mqlb patch (across the cluster, issue 12): the waits of the PUBLISHes read since the
    /// last call, in order.
    pub fn take_ack_waits(&mut self) -> std::collections::vec_deque::Drain<'_, (u16, AckWait)> {
        self.ack_waits.drain(..)
    }

    pub async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        Protocol::write(&self.protocol, packet, &mut self.write)?;
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    /// mqlb patch (zero-length Client Identifier): the codec's rule, see
    /// [`Protocol::empty_client_id_needs_clean_session`].
    pub fn empty_client_id_needs_clean_session(&self) -> bool {
        self.protocol.empty_client_id_needs_clean_session()
    }

    /// mqlb patch (Maximum Packet Size): the largest packet the client takes (MQTT-3.1.2-24).
    pub fn set_max_outgoing_size(&mut self, max: Option<u32>) {
        self.max_outgoing_size = max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    }

    /// mqlb patch (Maximum Packet Size): writes `packets` but those larger than the client's
    /// Maximum Packet Size, which are not sent (MQTT-3.1.2-24, -25). Returns the QoS and packet
    /// id of each PUBLISH left out, whose flow the caller completes as if it had been sent.
    pub async fn writev_within(
        &mut self,
        packets: VecDeque<Packet>,
    ) -> Result<Vec<(QoS, u16)>, Error> {
        let Some(max) = self.max_outgoing_size else {
            self.writev(packets).await?;
            return Ok(Vec::new());
        };
        let mut discarded = Vec::new();
        for packet in packets {
            let before = self.write.len();
            let publish = match &packet {
                Packet::Publish(p, _) => Some((p.qos, p.pkid)),
                _ => None,
            };
            Protocol::write(&self.protocol, packet, &mut self.write)?;
            if self.write.len() - before > max {
                self.write.truncate(before);
                tracing::debug!(
                    max,
                    ?publish,
                    "packet over the client's Maximum Packet Size not sent"
                );
                if let Some(p) = publish {
                    discarded.push(p);
                }
            }
        }
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(discarded)
    }

    pub async fn writev(&mut self, packets: VecDeque<Packet>) -> Result<(), Error> {
        for packet in packets {
            Protocol::write(&self.protocol, packet, &mut self.write)?;
        }
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }
}

pub trait N: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> N for T where T: AsyncRead + AsyncWrite + Unpin + Send {}
